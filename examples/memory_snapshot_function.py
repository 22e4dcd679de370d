import warmboot as modal

app = modal.App("memory-snapshot-function")


@app.function(enable_memory_snapshot=True)
def my_func():
    print("hello")
