"""hayai.train"""
