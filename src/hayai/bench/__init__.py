"""hayai.bench"""
