"""lare"""
