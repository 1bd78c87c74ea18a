"""Jobs: their lifecycle, the queue, the worker and the isolated pipeline that turns a series
into outputs."""
