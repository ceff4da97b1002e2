"""raysys.eval"""
