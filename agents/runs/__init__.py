"""The life of a run, one module per step.

    submit       validate, answer from the cache, coalesce, admit, insert, dispatch after commit
    coalescing   identical cacheable runs in flight share one execution (submit's side of it)
    dispatch     the messages that carry run ids to a tier's queue, and the markers that show them alive
    execute      a worker claims the runs of a message in one statement and calls their agents
    finish       every terminal transition, in bulk where runs end together
    inflight     the Redis keys naming the leader of an input in flight
    cancellation cancelling a run, and interrupting its agent inside the worker
    recovery     the sweeper: what a lost worker, message or key left behind
    selectors    finding, listing and waiting on runs
    context      what an agent gets: ctx.submit, ctx.publish, ctx.logger

`finish` stands below the others: they call it and it calls none of them, so the end of a run
reaches its followers through the database and the dispatcher, never by importing `submit`.
"""
