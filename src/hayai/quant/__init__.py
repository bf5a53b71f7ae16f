"""hayai.quant"""
