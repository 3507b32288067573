"""The in-process dispatcher API that the CLI, the server extension, the magic and the
kernel use (implemented by ``crucible_jupyter.dispatcher.core.CrucibleDispatcher``).

::

    dispatcher = Dispatcher(config=traitlets_config)   # a traitlets Configurable
    await dispatcher.start()                           # migrate, reconcile, schedule
    execution = await dispatcher.submit(request_dict, user="alice")  # persisted `queued`
    async for event in dispatcher.subscribe(execution.id, after=-1):  # models.Event
        ...                                            # ends after the terminal status
    execution = await dispatcher.wait(execution.id)    # until terminal
    execution = await dispatcher.get(execution.id)     # NotFound if unknown
    execution = await dispatcher.cancel(execution.id)  # Conflict if already finished
    page, next_cursor = await dispatcher.list(user=None, status=None, tag=None,
                                              since=None, until=None, cursor=None,
                                              limit=50)
    events = await dispatcher.events(execution.id, after=-1)  # stored events
    stats = await dispatcher.stats(user=None, since=None)
    queue = dispatcher.queue_status(execution_id=None)  # depth, running, capacity, position
    dispatcher.busy                                     # True while anything is live
    await dispatcher.stop()                             # fail running work, flush, close
"""
