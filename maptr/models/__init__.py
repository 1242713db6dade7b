"""MapTRv2 in plain PyTorch modules, one concept per file, assembled by :func:`maptr.models.maptr.build_maptr`.

backbone (torchvision ResNet) -> fpn (one level) -> bev_encoder (position_encoding, deformable_attention
self-attention, spatial_cross_attention over camera_projection) -> map_head (decoder with decoupled
multihead_attention + deformable cross-attention, feed_forward) ; seg_heads for training only.
"""
