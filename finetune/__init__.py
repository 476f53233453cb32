"""gptforge.finetune"""
