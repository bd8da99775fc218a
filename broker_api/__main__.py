from broker_api.main import main

main()
