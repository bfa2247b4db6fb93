"""owner_svc"""
