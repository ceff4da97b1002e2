"""raysys.train"""
