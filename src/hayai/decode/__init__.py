"""hayai.decode"""
