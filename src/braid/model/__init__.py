"""braid.model"""
