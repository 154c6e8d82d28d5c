"""braid.moe"""
