"""dptrain.launcher"""
