"""The Flask apps behind port 8080 (``monitor``: the live page) and 8081 (``stats_api``: RAM/GPU JSON).

Both only read ``status/``; neither imports torch or training code (a test keeps it so).
"""
