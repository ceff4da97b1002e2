"""raysys.data"""
