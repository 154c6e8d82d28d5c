"""braid.train"""
