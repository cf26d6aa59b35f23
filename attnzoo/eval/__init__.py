"""attnzoo.eval"""
