"""dptrain.bench"""
