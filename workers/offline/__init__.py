"""The offline side: the transaction simulator, model training and export, and the demo/benchmark
producer of simulated live traffic. Nothing here runs on the serving path."""
