"""Constants shared by the model, training, serving and eval code."""

# Label value the loss ignores (torch's cross-entropy default).
IGNORE_INDEX = -100
# Sentinel id that marks where an image's features go in `input_ids`; never a real vocabulary id.
IMAGE_TOKEN_INDEX = -200

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
IMAGE_PLACEHOLDER = "<image-placeholder>"

# Serving: how often a worker reports to the controller, and when the controller gives up on it.
CONTROLLER_HEART_BEAT_EXPIRATION = 30
WORKER_HEART_BEAT_INTERVAL = 15

LOGDIR = "."
