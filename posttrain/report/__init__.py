"""What a run prints and writes for people to read: the run table (`table`), the data report
(`data`), training curves (`plots`), the sweep report (`sweep`) and `posttrain show` (`show`)."""
