"""The three map element classes of the MapTR benchmark, in label order (label i = CLASS_NAMES[i]).

Fixed by the protocol (hustvl/MapTR's nuScenes map classes without centerlines), so not a param: the
ground truth, the metric, the model's class count and every per-class report read this one tuple.
"""

CLASS_NAMES = ("divider", "ped_crossing", "boundary")
