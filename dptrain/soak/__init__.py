"""dptrain.soak"""
