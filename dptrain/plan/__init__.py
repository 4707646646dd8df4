"""dptrain.plan"""
