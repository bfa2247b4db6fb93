"""platform_svc"""
