"""Calls and maps, Modal style: `warmboot run examples/calls_and_maps.py` (or `python examples/calls_and_maps.py`).

Shows .remote / .spawn / FunctionCall.gather, the map family (map with kwargs, order_outputs and
return_exceptions, starmap, for_each, spawn_map), generators with .remote_gen, cancelling a call, a
modal.Retries policy, and the async forms (.aio) from an async local entrypoint.
"""

import asyncio
import time

import warmboot as modal

app = modal.App("calls-and-maps")


@app.function()
def square(x: int) -> int:
    return x * x


@app.function()
def power(base: int, exp: int = 2) -> int:
    return base**exp


@app.function()
def check_positive(x: int) -> int:
    if x < 0:
        raise ValueError(f"{x} is negative")
    return x


@app.function()
def slow_echo(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.function()
def countdown(n: int):
    yield from range(n, 0, -1)


_seen: set[str] = set()  # call ids this container has run (one container: max_containers=1)


@app.function(retries=modal.Retries(max_retries=3, backoff_coefficient=2.0, initial_delay=0.5), max_containers=1)
def fails_once(x: int) -> int:
    call_id = modal.current_function_call_id()
    if call_id not in _seen:  # the first attempt of each input fails; its retry, 0.5 s later, succeeds
        _seen.add(call_id)
        raise RuntimeError("transient failure")
    return x


@app.function()
def where_am_i() -> dict:
    return {"local": modal.is_local(), "call_id": modal.current_function_call_id()}


@app.local_entrypoint()
async def main() -> None:
    # Blocking calls work in an async entrypoint too; .aio gives their async forms.
    print("square(4) =", square.remote(4))
    print("await square.remote.aio(5) =", await square.remote.aio(5))
    print("asyncio.gather of .aio calls:", await asyncio.gather(*(square.remote.aio(i) for i in range(4))))

    # The map family.
    print("map:", list(square.map(range(5))))
    print("map with kwargs:", list(power.map([2, 3], kwargs={"exp": 3})))
    print("starmap:", list(power.starmap([(2, 5), (10, 2)])))
    print("as they finish:", list(slow_echo.map([0.6, 0.0, 0.3], order_outputs=False)))
    print("return_exceptions:", list(check_positive.map([1, -2, 3], return_exceptions=True)))
    print("async map:", [r async for r in square.map.aio([7, 8])])
    square.for_each(range(3))
    handle = square.spawn_map([10, 20, 30])
    print(f"spawn_map: {handle.num_inputs()} inputs ->", list(handle.iter()))

    # Spawned calls: gather returns results in order and raises the first error.
    print("gather:", modal.FunctionCall.gather(square.spawn(2), square.spawn(3)))
    try:
        modal.FunctionCall.gather(check_positive.spawn(1), check_positive.spawn(-1))
    except ValueError as exc:
        print("gather raised:", exc)

    # Cancel a call: .get() then raises modal.exception.InputCancellation.
    call = slow_echo.spawn(60)
    call.cancel()
    try:
        call.get()
    except modal.exception.InputCancellation as exc:
        print("cancelled:", exc)

    # Generators stream their values as they are yielded.
    print("remote_gen:", list(countdown.remote_gen(3)))
    print("async remote_gen:", [v async for v in countdown.remote_gen.aio(2)])

    print("with retries:", list(fails_once.map(range(3))))
    print("inside a container:", where_am_i.remote(), "| here: local =", modal.is_local())


if __name__ == "__main__":
    # The same, from a plain script: run the app for the block, showing its output like `warmboot run` does.
    with modal.enable_output(), app.run():
        asyncio.run(main())
