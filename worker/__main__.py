import sys

if sys.argv[1:2] == ["join"]:  # `tokenyard worker join ...`: enrol, then serve (worker/join.py)
    from worker.join import main as join

    join(sys.argv[2:])
else:
    from worker.main import main

    main()
