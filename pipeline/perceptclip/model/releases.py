"""The released PerceptCLIP checkpoints, by the built-in names that ``--model`` takes (PAPER.md)."""

# built-in name -> (Hugging Face repository, file, task)
BUILTIN_MODELS = {
    "perceptclip-iqa": ("PerceptCLIP/PerceptCLIP_IQA", "perceptCLIP_IQA.pth", "iqa"),
    "perceptclip-memorability": ("PerceptCLIP/PerceptCLIP_Memorability", "perceptCLIP_Memorability.pth", "memorability"),
    "perceptclip-emotion": ("PerceptCLIP/PerceptCLIP_Emotions", "perceptCLIP_Emotions.pth", "emotion"),
}
# beside them, the debug model (``model.debug``), made locally: random weights, for seeing the job run
DEBUG_MODEL = "perceptclip-debug"
