from prune2tvm.cli import main

main()
