"""braid.overlap"""
