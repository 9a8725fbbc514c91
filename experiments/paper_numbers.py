"""The StreamDiffusionV2 paper's numbers, as plain data, for tables that set ours beside them.

Source: ``shared/spec/anchors.md`` (compiled from arXiv 2511.07399v1 as a text conversion; the PDF is the
ground truth). Each table names its section there. Models are "1.3B" and "14B", resolutions "480p" (480x832)
and "512x512".
"""

# ---- §1.3: FPS on H100 NVLink, bf16 (Fig. 9 = 1.3B, Fig. 11 = 14B).
# {(model, resolution): {GPUs: [FPS at 1, 2, 3, 4 denoising steps]}}. In the 480p panels the GPU order was
# inferred (anchors.md explains how); more than 1 GPU is the paper's pipeline-parallel mode.
FPS_H100_SOURCE = "anchors.md §1.3 (paper Fig. 9 / Fig. 11, H100 NVLink, bf16)"
FPS_H100 = {
    ("1.3B", "480p"): {
        1: [20.47, 17.97, 15.68, 13.95],
        2: [39.77, 34.67, 30.69, 27.06],
        3: [43.88, 43.79, 41.13, 38.09],
        4: [44.38, 43.41, 43.08, 42.26],
    },
    ("1.3B", "512x512"): {
        1: [26.21, 24.02, 21.51, 19.43],
        2: [51.76, 46.92, 41.09, 37.49],
        3: [63.45, 62.76, 56.75, 54.09],
        4: [64.52, 63.99, 62.43, 61.57],
    },
    ("14B", "480p"): {
        1: [12.68, 8.64, 6.49, 5.28],
        2: [25.39, 17.31, 13.23, 10.69],
        3: [37.55, 25.02, 19.12, 15.42],
        4: [39.24, 33.36, 25.02, 20.05],
    },
    ("14B", "512x512"): {
        1: [18.71, 13.01, 10.09, 8.26],
        2: [37.12, 25.72, 20.11, 16.65],
        3: [53.84, 37.47, 29.34, 24.35],
        4: [58.28, 51.09, 38.41, 31.62],
    },
}

# ---- §1.3: one H100 without the stream batch (Fig. 15); 1 step is the same either way, so 2, 3, 4 steps only.
FPS_H100_NO_STREAM_BATCH_SOURCE = "anchors.md §1.3 (paper Fig. 15, 1.3B, 1 H100)"
FPS_H100_NO_STREAM_BATCH = {
    ("1.3B", "480p"): {2: 15.50, 3: 12.82, 4: 10.86},
    ("1.3B", "512x512"): {2: 19.15, 3: 15.14, 4: 12.43},
}

# ---- §1.3: one RTX 4090, 1.3B, without stream batch (the other GPU series' order is unresolved: left out).
FPS_RTX4090_1GPU_SOURCE = "anchors.md §1.3 (paper Fig. 9, RTX 4090 PCIe, 1 GPU, no stream batch)"
FPS_RTX4090_1GPU = {
    ("1.3B", "480p"): [8.58, 7.37, 6.27, 5.59],
    ("1.3B", "512x512"): [12.87, 11.76, 10.42, 7.87],
}

# ---- §1.4: time to first frame in seconds on H100, by input frame rate. StreamDiffusionV2 and CausVid at
# 2 steps, Wan2.1-1.3B at 50 steps. GPU count and resolution are not stated. 30 FPS SDv2: 0.36 s in the
# figure, 0.37 s in the text (the text's value is used).
TTFF_SOURCE = "anchors.md §1.4 (paper Fig. 10, H100)"
TTFF_S = {
    "StreamDiffusionV2": {16: 0.47, 30: 0.37},
    "CausVid": {16: 8.98, 30: 6.61},
    "Wan2.1-1.3B": {16: 104.54, 30: 102.18},
}
TTFF_FIRST_CHUNK_FRAMES = 5   # buffering part: 5/16 = 0.31 s, 5/30 = 0.17 s

# ---- §1.5: Table 1. CLIP score = mean cosine of consecutive output frames' CLIP ViT-B/32 embeddings x 100
# (our clip_consistency); warp error = RAFT-large flow of the input, uint8 (wrapping) difference on 0-255
# (our warp_error_uint8). Every method at 2 steps.
QUALITY_SOURCE = "anchors.md §1.5 (paper Table 1)"
QUALITY = [
    {"method": "StreamDiffusion", "clip_score": 95.24, "warp_error": 117.01},
    {"method": "StreamV2V", "clip_score": 96.58, "warp_error": 102.99},
    {"method": "CausVid (v2v variant)", "clip_score": 98.48, "warp_error": 78.71},
    {"method": "StreamDiffusionV2", "clip_score": 98.51, "warp_error": 73.31},
]

# ---- §1.5: Table 2, the ablation. The full configuration reads 73.13 here and 73.31 in Table 1 (the paper's
# own inconsistency).
ABLATION_SOURCE = "anchors.md §1.5 (paper Table 2)"
ABLATION = [
    {"sink_tokens": False, "dynamic_noise": False, "clip_score": 98.38, "warp_error": 79.51},
    {"sink_tokens": False, "dynamic_noise": True, "clip_score": 98.36, "warp_error": 75.71},
    {"sink_tokens": True, "dynamic_noise": False, "clip_score": 98.47, "warp_error": 73.64},
    {"sink_tokens": True, "dynamic_noise": True, "clip_score": 98.51, "warp_error": 73.13},
]

# ---- §1.7: the reference implementation (wheel 0.1.1) measured for this project on 1 H100 at 480p with the
# Wan VAE, SDPA, random weights and a stubbed text encoder: (end-to-end FPS, its own logged average FPS).
REFERENCE_WHEEL_SOURCE = "anchors.md §1.7 (reference wheel 0.1.1, 1 H100, 480p, Wan VAE)"
REFERENCE_WHEEL_480P = {
    ("1.3B", 1): (12.46, 14.58),
    ("1.3B", 2): (10.64, 12.59),
    ("1.3B", 4): (10.51, 12.37),
    ("14B", 2): (7.36, 8.84),
}

# ---- the peers table of anchors.md (§2, "what each project claims"): the plugin backbones' own published speed,
# each on its own GPU, clip length and VAE (not this harness's steady state).
PLUGIN_PAPER_FPS_SOURCE = "anchors.md §2 peers table (each project's own claim)"
PLUGIN_PAPER_FPS = {
    "causvid": (9.4, "1 GPU"),
    "self_forcing": (17.0, "H100"),
    "longlive": (20.7, "H100"),
    "krea_14b": (11.0, "B200"),
}
