"""lavit"""
