"""raysys.model"""
