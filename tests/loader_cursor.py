"""The part of a data loader a checkpoint holds, for checkpoint tests that train without data:
a position, saved and restored through state_dict / load_state_dict."""


class Cursor:
    def __init__(self):
        self.pos = 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]
