# Parametrized classes and with_options.
#
# Each distinct set of `modal.parameter()` values runs in its own pool of containers, with its own memory
# snapshot: `Greeter(language="fr")` and `Greeter(language="de")` never share a container, and calling
# `Greeter(language="fr")` again (from any process) reuses its warm containers or restores its snapshot.
# `Greeter.with_options(...)` gives a handle whose instances run with other resources or scaling.
#
#     warmboot run examples/parametrized_class.py
#     warmboot deploy examples/parametrized_class.py   # then: warmboot snapshot list

import os

import warmboot as modal

app = modal.App("parametrized-class")

GREETINGS = {"en": "Hello", "fr": "Bonjour", "de": "Hallo"}


@app.cls(enable_memory_snapshot=True, scaledown_window=10)
class Greeter:
    language: str = modal.parameter(default="en")
    exclaim: bool = modal.parameter(default=False)

    @modal.enter(snap=True)
    def load(self):
        # Runs once per parameter set, before its snapshot: the expensive setup (say, a model) for this
        # language only.
        self.word = GREETINGS[self.language]

    @modal.method()
    def greet(self, name: str) -> str:
        mark = "!" if self.exclaim else "."
        return f"{self.word}, {name}{mark} (container {os.environ.get('WARMBOOT_CONTAINER_ID')})"


@app.local_entrypoint()
def main():
    print(Greeter().greet.remote("world"))
    print(Greeter(language="fr", exclaim=True).greet.remote("le monde"))
    print(Greeter(language="de").greet.remote("Welt"))
    # The same parameters again: the same warm container as the first French greeting.
    print(Greeter(language="fr", exclaim=True).greet.remote("encore"))
    # A handle with a shorter timeout and at most one container; its instances get a pool of their own.
    quick = Greeter.with_options(timeout=30, max_containers=1)
    print(quick(language="en").greet.remote("quick"))
