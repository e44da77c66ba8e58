"""`igw demo`: the README's main job. Placeholder wiring is replaced by the test bed's full demo."""
