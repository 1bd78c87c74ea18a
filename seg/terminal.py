"""The width of every line the commands print (a default terminal's 80 columns): one number, so a
table, a wrapped note and the demo's report agree on it."""

COLUMNS = 80
