"""heima"""
