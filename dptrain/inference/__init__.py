"""dptrain.inference"""
