"""braid.parallel"""
