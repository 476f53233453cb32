"""gptforge.configs"""
