"""hayai.peft"""
