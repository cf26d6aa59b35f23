"""attnzoo.mitigation"""
