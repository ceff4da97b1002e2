"""raysys.tune"""
