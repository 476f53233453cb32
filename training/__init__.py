"""gptforge.training"""
