"""hayai.serve"""
