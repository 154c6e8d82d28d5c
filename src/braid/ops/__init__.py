"""braid.ops"""
