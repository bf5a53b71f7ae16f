"""hayai.prompting"""
