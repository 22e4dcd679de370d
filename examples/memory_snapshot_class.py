import warmboot as modal

app = modal.App("memory-snapshot-class")


@app.cls(enable_memory_snapshot=True)
class MyCls:
    @modal.enter(snap=True)
    def load(self): ...
