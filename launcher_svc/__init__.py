"""launcher_svc"""
