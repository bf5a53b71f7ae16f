"""hayai.models"""
